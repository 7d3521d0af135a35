"""lesion_app: the Streamlit app's own code (wording, session caches, charts, the training-job launcher).

It sits beside ``app_pages/`` and ``streamlit_app.py`` and builds on the :mod:`lesion` library, which
never imports Streamlit or chart packages. Nothing here is meant for notebook users.
"""
