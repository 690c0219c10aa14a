"""ComfyUI itself: the client (HTTP API, the websocket a job follows, typed answers) and the
supervisor that runs ComfyUI as a child process when this instance starts it."""
