"""The node daemon: runs on every GPU machine (registration and load come with the nodes issue)."""
