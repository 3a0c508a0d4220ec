"""ComfyUI: provisioning (vendor), supervision (process), the HTTP + websocket client (client),
the meaning of its answers (outcomes), workflow templates (workflows), models (inventory), and the
engine that ties them together (engine)."""
