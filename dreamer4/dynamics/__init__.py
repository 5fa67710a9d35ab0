"""World-model dynamics: model.py, shortcut.py (forcing loss + K-step denoiser), sampler.py, train.py, evaluate.py."""
