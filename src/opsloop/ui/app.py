"""The entrypoint `streamlit run` executes (`opsloop ui` starts it): pages and navigation.

Streamlit runs this file as `__main__` on every rerun; `main()` sets the page up, shows where the
app looks (server, workspace) in the sidebar and runs the page the user chose. Importing the
module does nothing, so the page modules stay importable and testable on their own.
"""

from __future__ import annotations

from pathlib import Path

APP_PATH = Path(__file__)
# Page titles and URL paths, in the order of the navigation (the first is the landing page).
PAGES = (
    ("Predict", "predict", ":material/draw:"),
    ("Models", "models", ":material/inventory_2:"),
    ("Monitoring", "monitoring", ":material/monitoring:"),
    ("Loop", "loop", ":material/all_inclusive:"),
)


def main() -> None:
    """Configure the page, build the navigation and run the current page."""
    import streamlit as st

    from opsloop.errors import OpsloopError
    from opsloop.ui import loop, models, monitoring, predict
    from opsloop.ui.settings import get_settings

    st.set_page_config(page_title="opsloop", page_icon=":material/all_inclusive:", layout="wide")
    try:
        settings = get_settings()
    except OpsloopError as exc:  # a bad OPSLOOP_UI_* variable: say which, render nothing else
        st.error(str(exc))
        st.stop()
    renders = {"predict": predict.render, "models": models.render}
    renders |= {"monitoring": monitoring.render, "loop": loop.render}
    pages = [
        st.Page(renders[path], title=title, icon=icon, url_path=path, default=index == 0)
        for index, (title, path, icon) in enumerate(PAGES)
    ]
    page = st.navigation(pages)
    with st.sidebar:
        st.markdown("**opsloop** - data, train, registry, serve, monitor, loop")
        st.caption(
            f"Server {settings.server_url} (model {settings.model_name}) · workspace "
            f"{settings.workspace.expanduser().resolve()}"
        )
    page.run()


if __name__ == "__main__":
    main()
