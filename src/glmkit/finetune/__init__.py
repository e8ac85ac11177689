"""Fine-tuning ChatGLM3 on one's own conversations.

data.py: the official finetune data format (JSON Lines of `{"conversations": [...]}`) read and
checked, and a conversation as token ids with its loss labels; export.py: console conversations
(the server's store) as such records.  Plain Python lists of ids: nothing here imports torch.
"""
