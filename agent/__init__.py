"""The agent: runs on each GPU server, owns a ComfyUI and (later) the speech and media runners."""
