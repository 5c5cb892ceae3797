#!/bin/sh
# docs/dump_page.png: the dump page of the zoo's attention block backward, as
# Debian's chromium draws it headless (apt-get install chromium pngquant optipng).
# Usage: scripts/dump_page_screenshot.sh [out.png]
set -e
out=${1:-docs/dump_page.png}
dumps=$(mktemp -d)
python - "$dumps" <<'PY'
import sys

import torch

import retrograd

sys.path.insert(0, "tests")
from zoo import ZOO

entry = ZOO["attention_block"]
torch.manual_seed(0)
compiled = retrograd.compile(entry.model(), dump_dir=sys.argv[1], executor="interpret")
entry.run(compiled, entry.inputs()).backward()
PY
page=$(ls -d "$dumps"/*-backward)/index.html
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1180,1010 \
    --screenshot="$dumps/page.png" "file://$page" 2>/dev/null
pngquant --quality 60-85 --speed 1 -f -o "$out" "$dumps/page.png"
optipng -quiet -o5 "$out"
rm -rf "$dumps"
echo "wrote $out"
