"""Real-model tasks: prompts made offline and a gold judge from a well-known scorer (see rlchat.tasks.readable)."""
