"""Every Redis key the service reads or writes, one function each (as arq keeps its prefixes in
one module): the status store's, the queue's and the fleet's. Nothing else spells a key.

Status (`serverless.status.redis`), kept RETENTION (the status retention) after the last write:

    task:<id>                 the number of the task's newest attempt (INCR claims the next one)
    task:<id>:<n>             attempt n: a stream, one entry per payload, entry id `0-<seq>`
    task:<id>:<n>:alive       set while attempt n's runner lives (expires after STATUS_STALE_AFTER)
    task:<id>:<n>:cancel      a cancel request for attempt n, where there is no queue
    task:<id>:<n>:previews    attempt n's newest sampler previews (a stream of PREVIEWS_KEPT entries,
                              kept PREVIEWS_TTL seconds), for a job that asked `previews`
    task:<id>:<n>:result      attempt n's terminal payload whole, base64 outputs included (its
                              stream keeps it without them); kept FILE_LINK_EXPIRES at least
    task:<id>:owner           whose the task is ("": made without API keys)
    task:<id>:webhook         how the task's webhook went (JSON)
    idempotency:<key>         an `Idempotency-Key` claim, where there is no queue
    tasks                     a sorted set: every task ("<id> <workflow id>"), scored by when it was
                              made (ms); members older than RETENTION are dropped as others come
    tasks:owner:<owner>       the same, of one API key's tasks (`GET /api/tasks` with API_KEYS)

Queue (`serverless.fleet`):

    jobs:<priority>           a stream per priority (high, normal, low), consumer group `workers`
                              (the default lane; lane L's are jobs:L:<priority>)
    jobs:<priority>:added     how many entries were ever added to that stream (an entry's ordinal)
    fleet:lanes               a set: the lanes jobs were queued in or workers serve ("" the default)
    fleet:workers             a sorted set: every worker's name, scored by its last heartbeat (ms)
    fleet:worker:<name>       a worker's heartbeat (JSON: lane, nodes, model files, resident models,
                              VRAM, busy), expiring HEARTBEAT_TTL after its last
    fleet:handoff:<name>      a stream (MAXLEN 1) that wakes a worker handed a job (affinity)
    fleet:idle:<lane>         the name of a worker of that lane idle in its blocking read, the
                              only live worker (expires with that read): a gateway's enqueue
                              gives it the job it queues (`queue.ENQUEUE`)
    fleet:given:<name>        a stream (capped): the jobs given to that worker as they were queued,
                              taken for it (each entry: the queue entry's stream, id, fields and
                              its take's answer); wakes its blocking read with the job itself
    job:<id>                  "<stream> <entry id> <ordinal>" of the task's newest submission
    idem:<key>                "<task_id> <fingerprint>" of the first request with that key
    run:<id>:<entry>          who took that submission: a worker's name, or "cancelled" (SET NX)
    cancel:<id>:<entry>       a stream: one entry once a cancel of that submission was acknowledged
    ended:<id>:<entry>        a stream: one entry (`state`) once its worker decided how it ends
    dead:jobs                 queue entries no worker could read (dead letters, capped)
    staged:<id>:<name>        a hash: a submission's big inputs, apart from its queue entry
                              (kept QUEUE_TTL + two runs; deleted as the entry is acknowledged)
    fleet:handoffs            a stream (capped): entries given back to the queue by a worker that
                              stopped or whose ComfyUI died; wakes free workers to take them at once
    file:<digest>             an output's bytes for its download link, on a fleet (gateways have
                              no ComfyUI to read it from); kept as long as the link is valid
    fleet:object_info         the `/object_info` a worker's ComfyUI answered, for gateways
    fleet:comfyui_info        a hash: its other informational answers (`/system_stats`, `/models`...)
    fleet:models              a hash: each worker's model store listing (JSON), by instance
    watch:<instance>          wakes an instance's one blocking read when a stream is followed anew

ComfyUI's own API (`serverless.comfyapi`), kept RETENTION:

    comfy:number              ComfyUI's prompt `number` (INCR)
    comfy:prompts             a sorted set: every prompt's task id, scored by its order of queueing
    comfy:live                the same, of the prompts not yet seen ended (`/queue`)
    comfy:prompt:<id>         a prompt as `/queue` and `/history` show it (JSON)
    comfy:client:<client id>  a stream of the task ids queued for that websocket client
    comfy:upload:<name>       an uploaded input's bytes, until a job takes it to its ComfyUI
    comfy:asset:<id>          an API v2 asset record (JSON); its bytes are an upload's
    comfy:asset-hash:<hash>   the newest asset record over the bytes of that blake3 hash
    comfy:idem:<key>          an API v2 `Idempotency-Key` claimed (24 h; a repeat is refused)

Batches (`serverless.batches.redis`), kept RETENTION after the last write:

    batch:<id>                a batch's spec (JSON)
    batch:<id>:progress       its progress (JSON), written by the instance feeding it
    batch:<id>:states         a hash: item index -> the item's state
    batch:<id>:events         a stream of its events, entry id `0-<seq>`
    batch:<id>:lease          the instance feeding it (SET NX with an expiry)
    batch:<id>:cancel         set once a cancel was asked
    batch:<id>:retry          a list: items asked to run again (JSON lists of indices)
    batches:live              a set: the batches not ended (to feed)

Tenants (`serverless.tenants`, `serverless.fleet.admission`), per API key (its owner id):

    key:<owner>:rate          the key's rate limit state (GCRA: the theoretical arrival time, ms)
    key:<owner>:admitted      a sorted set: its task ids in the shared queue or running, by admission time
    key:<owner>:held          a stream: its jobs over its `concurrency=`, waiting to be admitted
    key:<owner>:limit         its `concurrency=`, as the last gateway to admit one of its jobs read it
    usage:<owner>:<hour>      a hash: its usage in that hour (jobs by state, GPU seconds, bytes out...)
"""

from __future__ import annotations


def attempts(task_id: str) -> str:
    return f"task:{task_id}"


def attempt(task_id: str, number: int) -> str:
    return f"task:{task_id}:{number}"


def alive(task_id: str, number: int) -> str:
    return f"{attempt(task_id, number)}:alive"


def cancel_request(task_id: str, number: int) -> str:
    return f"{attempt(task_id, number)}:cancel"


def previews(task_id: str, number: int) -> str:
    return f"{attempt(task_id, number)}:previews"


def result(task_id: str, number: int) -> str:
    return f"{attempt(task_id, number)}:result"


def owner(task_id: str) -> str:
    return f"task:{task_id}:owner"


def webhook(task_id: str) -> str:
    return f"task:{task_id}:webhook"


TASKS = "tasks"


def tasks_of(owner: str) -> str:
    return f"tasks:owner:{owner}"


def idempotency(key: str) -> str:
    return f"idempotency:{key}"


def queue(priority: str, lane: str = "") -> str:
    return f"jobs:{lane}:{priority}" if lane else f"jobs:{priority}"


def queue_count(priority: str, lane: str = "") -> str:
    return f"{queue(priority, lane)}:added"


LANES = "fleet:lanes"
WORKERS = "fleet:workers"


def worker(name: str) -> str:
    return f"fleet:worker:{name}"


def handoff(name: str) -> str:
    return f"fleet:handoff:{name}"


def idle_worker(lane: str) -> str:
    return f"fleet:idle:{lane}"


def given(name: str) -> str:
    return f"fleet:given:{name}"


def submission(task_id: str) -> str:
    return f"job:{task_id}"


def queue_idempotency(key: str) -> str:
    return f"idem:{key}"


def run_claim(task_id: str, entry: str) -> str:
    return f"run:{task_id}:{entry}"


def queue_cancel(task_id: str, entry: str) -> str:
    return f"cancel:{task_id}:{entry}"


def queue_ended(task_id: str, entry: str) -> str:
    return f"ended:{task_id}:{entry}"


DEAD_LETTERS = "dead:jobs"
HANDOFFS = "fleet:handoffs"


def staged_inputs(task_id: str, name: str) -> str:
    return f"staged:{task_id}:{name}"


def key_rate(owner: str) -> str:
    return f"key:{owner}:rate"


def key_admitted(owner: str) -> str:
    return f"key:{owner}:admitted"


def key_held(owner: str) -> str:
    return f"key:{owner}:held"


def key_limit(owner: str) -> str:
    return f"key:{owner}:limit"


def usage(owner: str, hour: int) -> str:
    return f"usage:{owner}:{hour}"


def file(digest: str) -> str:
    return f"file:{digest}"


def watch_wake(instance: str) -> str:
    return f"watch:{instance}"


OBJECT_INFO = "fleet:object_info"
COMFYUI_INFO = "fleet:comfyui_info"  # path -> a worker's ComfyUI's answer (`/system_stats`, `/models`...)
MODELS = "fleet:models"  # instance -> its model store's listing (`serverless.models.listing`)


COMFY_NUMBER = "comfy:number"
COMFY_PROMPTS = "comfy:prompts"
COMFY_LIVE = "comfy:live"


def comfy_prompt(task_id: str) -> str:
    return f"comfy:prompt:{task_id}"


def comfy_client(client_id: str) -> str:
    return f"comfy:client:{client_id}"


def comfy_upload(name: str) -> str:
    return f"comfy:upload:{name}"


def comfy_asset(asset_id: str) -> str:
    return f"comfy:asset:{asset_id}"


def comfy_asset_hash(digest: str) -> str:
    return f"comfy:asset-hash:{digest}"


def comfy_idempotency(key: str) -> str:
    return f"comfy:idem:{key}"


def batch(batch_id: str) -> str:
    return f"batch:{batch_id}"


def batch_part(batch_id: str, part: str) -> str:
    """One of a batch's other keys: progress, states, events, lease, cancel, retry."""
    return f"batch:{batch_id}:{part}"


BATCHES_LIVE = "batches:live"
