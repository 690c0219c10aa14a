"""The transports: one job's event sequence rendered for its caller.

    start.start_job      request (HTTP or websocket) -> JobSpec -> Jobs.start -> Job
    caller.watch         the caller-watch: delivery raced against the caller leaving (TaskGroup)
    bursts.bursts        a job's events grouped into the writes SSE and the websocket make
    http                 JSON (sync, held async) and SSE renderers
    websocket            the websocket renderer

Every renderer reads `Job.events()` (or `Job.finished()`), which hands out the terminal payload
only once the status log has it; errors become payloads through `ServerlessError.to_payload`.
"""
