"""The rollout engine: KV cache, decode state, thinking-marker automaton, `RolloutEngine`."""
