"""lesion: benign vs malignant dermoscopy classification with Grad-CAM and OOD rejection.

A demonstration and research tool, not a medical device: it does not diagnose.
This package never imports Streamlit; the app in ``streamlit_app.py`` and ``pages/``
is a thin layer over it.
"""

__version__ = "0.1.0"
