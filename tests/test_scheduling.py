"""The suite's xdist scheduling (tests/conftest.py): groups go to the workers longest first.

Simulated with xdist's own scheduler class and two stand-in workers, so it runs without -n.
"""

from types import SimpleNamespace

import conftest


class Worker:
    """What xdist's scheduler calls on a worker: which test indices it was sent, in order."""

    def __init__(self, name):
        self.sent, self.shutting_down, self.gateway = [], False, SimpleNamespace(id=name)

    def send_runtest_some(self, indices):
        self.sent.append(indices)

    def shutdown(self):
        self.shutting_down = True


def collection() -> list[str]:
    """Node ids in file order, sorted the way conftest sorts the collected items; test_nn has more
    tests than test_behavior and test_slurm, so a sort by test count would put it before them."""
    ids = (
        [f"tests/test_agent.py::test_{i}" for i in range(3)]
        + [f"tests/test_behavior.py::test_{i}" for i in range(3)]
        + [f"tests/test_dynamics.py::test_{i}" for i in range(3)]
        + [f"tests/test_images.py::test_{i}" for i in range(2)]
        + [f"tests/test_nn.py::test_{i}" for i in range(25)]
        + ["tests/test_slurm.py::test_0"]
    )
    items = [SimpleNamespace(nodeid=n) for n in ids]
    conftest.pytest_collection_modifyitems(None, items)
    return [it.nodeid for it in items]


def test_groups_are_handed_out_longest_first_not_by_test_count():
    config = SimpleNamespace(
        option=SimpleNamespace(loadscopereorder=True),  # xdist's default
        getvalue=lambda name: ["2*popen"] if name == "tx" else None,
    )
    sched = conftest.pytest_xdist_make_scheduler(config, None)
    ids = collection()
    workers = [Worker("gw0"), Worker("gw1")]
    for w in workers:
        sched.add_node(w)
    for w in workers:
        sched.add_node_collection(w, ids)
    sched.schedule()

    def groups(w):
        return [conftest.group_of(ids[i[0]]) for i in w.sent]

    # the world modules (agent, dynamics) form one group on the first worker; PPO starts the second
    assert groups(workers[0])[0] == "world" and groups(workers[1])[0] == "test_behavior"
    assert {ids[i] for i in workers[0].sent[0]} == {n for n in ids if "agent" in n or "dynamics" in n}
    # what is still queued keeps FIRST's order (slurm before the 25-test module), then file order
    assert list(sched.workqueue) == ["test_slurm", "test_nn", "test_images"]
