"""Tasks: the `Task` protocol, Reasoning Gym, prompts, rewards and verifiers."""
