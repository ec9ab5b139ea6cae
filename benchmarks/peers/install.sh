#!/usr/bin/env bash
# Install peer deconvolution methods, each group into its own venv under
# benchmarks/.venvs/<group>, from PyPI.  Usage:
#
#   bash benchmarks/peers/install.sh                 # all groups
#   bash benchmarks/peers/install.sh flashdeconv rctd
#   bash benchmarks/peers/install.sh cell2location   # method names map to their group
#   FORCE=1 bash benchmarks/peers/install.sh scvi    # rebuild a complete venv
#
# Groups (venv name -> pip requirements -> methods served by run_peer.py):
#   flashdeconv : flashdeconv                                 -> flashdeconv
#   rctd        : rctd-py                                     -> rctd
#   scvi        : scvi-tools, cell2location, pyro-ppl==1.9.1  -> cell2location, stereoscope, destvi
#   tangram     : tangram-sc                                  -> tangram
#
# rctd additionally gets benchmarks/.venvs/rctd/q_matrices.npz, rctd-py's
# likelihood table, computed locally by rctd_qmat.py (it is normally downloaded).
#
# Idempotent: a venv holding the marker file .peer-complete is skipped.
# Logs: benchmarks/.venvs/<group>.log.  Exit status is non-zero if any group
# failed; the other groups are still attempted.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BENCH="$(dirname "$HERE")"
VENVS="${PEER_VENVS:-$BENCH/.venvs}"
PY="${PYTHON:-python3}"
CONSTRAINTS="$HERE/constraints.txt"
mkdir -p "$VENVS"
# keep the venvs out of git even if the repo .gitignore does not list them
[ -f "$VENVS/.gitignore" ] || echo '*' > "$VENVS/.gitignore"

# NB: pinned versions are the ones verified by benchmarks/peers/smoke.py.
reqs_for() {
  case "$1" in
    flashdeconv) echo "flashdeconv==0.2.0 anndata" ;;
    rctd)        echo "rctd-py==0.4.0 anndata" ;;
    scvi)        echo "scvi-tools==1.4.2 cell2location==0.1.5 pyro-ppl==1.9.1 anndata" ;;
    tangram)     echo "tangram-sc==1.0.4 anndata" ;;
    *) return 1 ;;
  esac
}
check_for() {   # import test run in the venv after install
  case "$1" in
    flashdeconv) echo "import flashdeconv, anndata" ;;
    rctd)        echo "import rctd, anndata" ;;
    scvi)        echo "import scvi, cell2location, pyro; from scvi.external import RNAStereoscope, SpatialStereoscope; from scvi.model import CondSCVI, DestVI" ;;
    tangram)     echo "import tangram, anndata" ;;
  esac
}
post_install() {   # extra build steps run in the venv after pip (inside the logged subshell)
  case "$1" in
    rctd)
      # rctd-py downloads its 404 MB likelihood table (Q-matrices) at run time;
      # there is no internet here, so build it locally (~5 min on 2 cores,
      # checked against rctd's own get_Q).  run_peer.py sets $RCTD_Q_MATRICES.
      if [ ! -f "$2/q_matrices.npz" ]; then
        "$2/bin/python" "$HERE/rctd_qmat.py" "$2/q_matrices.npz.tmp.npz" --check
        mv "$2/q_matrices.npz.tmp.npz" "$2/q_matrices.npz"
      fi ;;
  esac
}
group_of() {
  case "$1" in
    flashdeconv) echo flashdeconv ;;
    rctd|rctd-py) echo rctd ;;
    scvi|scvi-tools|cell2location|stereoscope|destvi) echo scvi ;;
    tangram|tangram-sc) echo tangram ;;
    *) return 1 ;;
  esac
}

ALL="flashdeconv rctd tangram scvi"
if [ "$#" -eq 0 ]; then set -- $ALL; fi
GROUPS_TODO=""
for n in "$@"; do
  g="$(group_of "$n")" || { echo "install.sh: unknown peer '$n' (known: $ALL cell2location stereoscope destvi)" >&2; exit 2; }
  case " $GROUPS_TODO " in *" $g "*) ;; *) GROUPS_TODO="$GROUPS_TODO $g" ;; esac
done

FAILED=""
for g in $GROUPS_TODO; do
  venv="$VENVS/$g"; log="$VENVS/$g.log"
  if [ -f "$venv/.peer-complete" ] && [ -z "${FORCE:-}" ] \
     && { [ "$g" != rctd ] || [ -f "$venv/q_matrices.npz" ]; }; then
    echo "[peers] $g: already installed ($venv), skipping"
    continue
  fi
  echo "[peers] $g: installing into $venv (log: $log)"
  rm -rf "$venv"
  (
    set -e
    echo "=== $(date -Is) install $g: $(reqs_for "$g")"
    "$PY" -m venv "$venv"
    "$venv/bin/python" -m pip install --upgrade pip wheel setuptools
    # shellcheck disable=SC2046
    "$venv/bin/python" -m pip install -c "$CONSTRAINTS" $(reqs_for "$g")
    "$venv/bin/python" -c "$(check_for "$g")"
    post_install "$g" "$venv"
    "$venv/bin/python" -m pip freeze > "$venv/peer-freeze.txt"
    echo "=== $(date -Is) done $g"
  ) > "$log" 2>&1
  rc=$?
  if [ $rc -eq 0 ] && "$venv/bin/python" -c "$(check_for "$g")" >> "$log" 2>&1; then
    date -Is > "$venv/.peer-complete"
    echo "[peers] $g: OK"
  else
    echo "[peers] $g: FAILED (exit $rc) -- see $log; last lines:" >&2
    tail -n 15 "$log" >&2
    FAILED="$FAILED $g"
  fi
done

if [ -n "$FAILED" ]; then
  echo "[peers] install FAILED for:$FAILED" >&2
  exit 1
fi
echo "[peers] all requested peers installed under $VENVS"
