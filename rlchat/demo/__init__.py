"""The built-in demo task (see rlchat/demo/task.py): data writer and gold judge. No torch needed."""
from rlchat.demo.task import corpus_texts, judge, write_demo_data

__all__ = ["corpus_texts", "judge", "write_demo_data"]
