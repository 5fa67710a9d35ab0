"""PPO behaviour policy trained online in Craftax, for collecting datasets of competent play."""
