"""Helpers behind the Streamlit app (`app.py`): checkpoint discovery, input handling, examples and visuals.

Nothing here imports Streamlit, so every helper can be tested without running the app.
"""
