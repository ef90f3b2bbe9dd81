"""Examples beside the dgrpo package: rewards by import path (examples/rewards.py) and configs that use them."""
