"""What each UI tab shows and what its clicks do, in plain Python (no gradio here).

One module per tab: `chat`, `model`, `dashboard`, `sharing`. A controller takes the services it
needs (narrow protocols where a test double is handy), returns plain data (dataclasses, strings,
lists) and raises `appliance.errors` for what the user must be told. The tab's `ui/*.py` module
only lays out widgets, maps that data to `gr.update(...)` and turns the errors into
`gr.Error`/`gr.Warning`. So every decision can be unit-tested without a browser.
"""
