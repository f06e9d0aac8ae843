"""The face of opsloop: a Streamlit app over a running server, the registry, the log and the loop.

    opsloop ui                   # http://127.0.0.1:8501, next to `opsloop serve` on :8000
    make ui                      # both: the server in the background, then the app

Pages: Predict (draw or upload a digit, see the answer, send the true label), Models (versions,
aliases, lineage, the promotion history with each gate decision), Monitoring (drift and accuracy
over time, recent predictions) and Loop (the loop's runs as a timeline). Torch-free, like serve:
the server is reached over the Open Inference Protocol, everything else through opsloop's own
modules. Settings are `OPSLOOP_UI_*` variables (`opsloop.ui.settings.UISettings`).

- `settings`: `OPSLOOP_UI_*`, and where each store is when unset
- `client`: the inference server and the monitor over HTTP
- `data`: the registry, the prediction log and the loop history, read into plain rows
- `sketch`: the drawing pad (a tiny inline Streamlit component, no network)
- `app`: the entrypoint `streamlit run` executes; `layout` and the four page modules render
- `launch`: `opsloop ui`, the command that starts Streamlit
"""
