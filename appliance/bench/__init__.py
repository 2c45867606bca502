"""`step-station bench` and `step-station tune-moe`: the pieces that need no GPU and no engine.

`presets` builds the argv of vLLM's own `vllm bench serve`; `result` reads the file it writes;
`progress` reads its progress bar; `store` keeps past runs in SQLite beside the chat history;
`tune` knows vLLM's tuned MoE config files (name, format, folder). Wiring into the CLI, the
engine and the UI lives elsewhere.
"""
