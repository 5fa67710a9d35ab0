"""One process of a multi-process test job: runs several `dreamer4` commands in one interpreter.

    python tests/multihost_worker.py '[["train-tokenizer", ...], ["train-dynamics", ...]]'

Every command gets the same --coordinator/--num-processes/--process-id flags from the test, and
`jax.distributed` is initialised once by the first of them (runtime/distributed.py); the
"framehash:" test policy is registered for `collect`. Exits with the first non-zero exit code.
"""

import faulthandler
import json
import signal
import sys

import framehash_policy  # noqa: F401  (registers the "framehash:" policy)

from dreamer4.cli import main

if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR2, all_threads=True)  # `kill -USR2 PID` shows where a job hangs (USR1 stops it)
    for argv in json.loads(sys.argv[1]):
        rc = main(argv)
        if rc:
            sys.exit(rc)
