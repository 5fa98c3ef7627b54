"""python -m sfl_ray.report RUN_DIR... [--out DIR] [--target VALUE]"""

from sfl_ray.report import main

raise SystemExit(main(prog="python -m sfl_ray.report"))
