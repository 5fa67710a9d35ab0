"""Agent stage: agent tokens and heads in the world model, BC + reward model, imagination RL, evaluation."""
