"""Benchmarks of the adapter against ComfyUI (the emulator, or a real one at COMFYUI_URL).

`python -m bench` prints a table of figures beside their goals. Never part of the test suite's
pass/fail: the figures depend on the machine and on what else runs on it.

    procs.py     the processes measured: emulator, app (through `bootstrap`), /proc readings
    clients.py   the load: ComfyUI's own native client, and the adapter's sync and SSE clients
    suite.py     the benchmarks, each returning figures
    report.py    figures as a text table and as Markdown
"""
