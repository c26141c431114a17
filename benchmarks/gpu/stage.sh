# Sourced by the GPU scripts: run_stage NAME SECONDS LOG CMD... runs CMD under `timeout`, appends its output to LOG,
# appends a JSON status line to $OUT/env.txt and never stops the calling script (a time-boxed stage keeps what it
# wrote).
run_stage() {
  local name=$1 secs=$2 log=$3; shift 3
  local t0=$SECONDS
  timeout --kill-after=10 "$secs" "$@" >>"$log" 2>&1
  local rc=$?
  echo "{\"stage\": \"$name\", \"rc\": $rc, \"timed_out\": $([ $rc -eq 124 ] || [ $rc -eq 137 ] && echo true || echo false), \"seconds\": $((SECONDS - t0)), \"limit_s\": $secs}" >>"$OUT/env.txt"
  echo "stage $name: rc $rc in $((SECONDS - t0)) s (limit $secs s)"
}
