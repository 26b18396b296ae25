#!/usr/bin/env bash
# Runs the README's fenced ```bash block that follows the marker <!-- ci:NAME -->, so CI runs exactly the
# commands a newcomer reads.
set -euo pipefail
name="$1"
script=$(awk -v marker="<!-- ci:${name} -->" '
  $0 == marker { armed = 1; next }
  armed && /^```bash/ { inside = 1; next }
  inside && /^```/ { exit }
  inside { print }
' README.md)
if [ -z "$script" ]; then
  echo "README.md has no \`\`\`bash block after <!-- ci:${name} -->" >&2
  exit 2
fi
echo "$script"
bash -euo pipefail -c "$script"
