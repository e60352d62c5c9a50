"""The PRG web demo as a Hugging Face Space (`sdk: gradio`, `app_file: app.py`), or locally: `python app.py`.

The model is the Space variable `PRG_DEMO_MODEL` (a Hub repo id or a folder), else the shipped CIFAR-10
classifier. The host and port are gradio's: a Space sets `GRADIO_SERVER_NAME` and `GRADIO_SERVER_PORT`.
"""

import os

from prg_hub.demo import build_demo, launch

demo = build_demo(os.environ.get("PRG_DEMO_MODEL"))

if __name__ == "__main__":
    launch(demo)
