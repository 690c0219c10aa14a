"""Models on demand (CONTRACT.md section 8, "Models"): a model loader input may name a model by
URL, `oss://`/`s3://` object or `sha256:`; the content-addressed store under MODEL_CACHE_DIR
fetches it once (single-flight, resumable, verified) and places it in ComfyUI's models folder.

    refs      which inputs are model references and what each names (pure)
    fetch     one HTTP(S) download streamed to a partial file, resumable, through the SSRF guard
    store     the cache: blobs by sha256, names placed in MODELS_DIR/<folder>, locks, eviction
    resolve   a job's references resolved: the workflow ComfyUI receives, and `data.models`
    imports   `POST /api/models` and friends as jobs (they run where the models live)
    endpoints the HTTP endpoints of /api/models
"""
