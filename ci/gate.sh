#!/usr/bin/env bash
# ci/gate.sh: the speed regression gate for any CI. Runs `infermatrix ab` (base and head
# interleaved in this one job) and leaves everything in $GATE_OUT:
#   summary.md (Markdown, for a PR comment), gate.json, runs/base, runs/head, log.txt.
# Exit code: 0 pass, 1 a confirmed regression, 2 bad input or a broken setup.
#
# Settings (environment):
#   GATE_BASE    base revision (default: the merge base of HEAD and origin/$GATE_BRANCH)
#   GATE_BRANCH  branch the merge base is taken from (default main)
#   GATE_HEAD    head revision (default HEAD)
#   GATE_MATRIX  matrix file inside the repository (default: the built-in default matrix)
#   GATE_OUT     output directory (default reports/gate)
#   GATE_ROUNDS  processes per cell and side (default 2)
#   GATE_THREADS intra-op threads per cell (default 1: on a shared runner a preempted thread stalls
#                a multi-threaded cell, doubling the noise; "matrix": the matrix's own [measure] threads)
#   GATE_ARGS    extra options for `infermatrix ab` (e.g. --speed-threshold 0.1)
#   INFERMATRIX  the command (default: infermatrix)
set -uo pipefail
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"  # the comment above
    exit 0
fi
OUT_DIR="${GATE_OUT:-reports/gate}"
HEAD_REV="${GATE_HEAD:-HEAD}"
BASE_REV="${GATE_BASE:-}"
if [ -z "$BASE_REV" ]; then
    BASE_REV="$(git merge-base HEAD "origin/${GATE_BRANCH:-main}" 2>/dev/null)" || {
        echo "gate: no GATE_BASE and no merge base with origin/${GATE_BRANCH:-main} (fetch it, or set GATE_BASE)" >&2
        exit 2
    }
fi
read -r -a CMD <<< "${INFERMATRIX:-infermatrix}"
read -r -a EXTRA <<< "${GATE_ARGS:-}"
mkdir -p "$OUT_DIR"
rm -rf "$OUT_DIR/runs"
ARGS=(ab "$BASE_REV" "$HEAD_REV")
[ -n "${GATE_MATRIX:-}" ] && ARGS+=("$GATE_MATRIX")
[ "${GATE_THREADS:-1}" != matrix ] && ARGS+=(--threads "${GATE_THREADS:-1}")
ARGS+=(--rounds "${GATE_ROUNDS:-2}" --out "$OUT_DIR/runs" --quiet
       --markdown "$OUT_DIR/summary.md" --json "$OUT_DIR/gate.json" "${EXTRA[@]}")
: > "$OUT_DIR/summary.md"
echo "gate: ${CMD[*]} ${ARGS[*]}"
"${CMD[@]}" "${ARGS[@]}" 2>&1 | tee "$OUT_DIR/log.txt"
status=${PIPESTATUS[0]}
if [ ! -s "$OUT_DIR/summary.md" ]; then  # bad input: say why where the summary would be
    { echo "## infermatrix regression gate"; echo; echo "The gate could not run (exit $status):"; echo
      echo '```'; tail -n 20 "$OUT_DIR/log.txt"; echo '```'; } > "$OUT_DIR/summary.md"
fi
[ -n "${GITHUB_STEP_SUMMARY:-}" ] && cat "$OUT_DIR/summary.md" >> "$GITHUB_STEP_SUMMARY"
echo "gate: exit $status; summary in $OUT_DIR/summary.md"
exit "$status"
