#!/usr/bin/env bash
# An HTTP worker in shell: it claims one `greet` task, a durable task of two steps, runs it, and
# says how it ended, through the HTTP API (api.py). Nothing here is Python: any language that
# speaks HTTP and JSON can do the same. Here, curl and jq.
#
#   HARDWAY_API_TOKEN=... ./http_worker.sh        # the API at $API, http://127.0.0.1:8011
#
# The API must know the task: `engine.declare_task("greet", durable=True)` in its --tasks
# module. Enqueue one with
#   curl -H "Authorization: Bearer $HARDWAY_API_TOKEN" -H 'Content-Type: application/json' \
#        -d '{"name": "greet", "input": {"name": "Ada"}}' $API/tasks
#
# The protocol, as this script follows it:
# 1. claim (POST /worker/claim): a long poll. The answer comes as soon as there is a task (200:
#    the task, its attempt number, its history), or after WAIT seconds (204: nothing to do).
# 2. the steps, numbered 1, 2... in the order the code takes them. A step the history holds is
#    NOT run again: its recorded result is used (a replay). A new step runs, and is recorded
#    (POST .../steps) before the next one starts: the log is the task's progress.
# 3. complete (POST .../complete) with the output; or fail (POST .../fail) with the error, and
#    the task is retried after a backoff, on this worker or another.
# Every request after the claim names the attempt. 409 means the attempt is over: the task was
# cancelled, it ran past its timeout, or this worker stalled past its lease and another took
# the task over. The script then stops at once: whatever it would write would be refused.
#
# STOP_AFTER_STEP=1: exit right after recording step 1, as if the worker had crashed there. Run
# the script again: once the first run's lease has run out (LEASE seconds), the second run
# claims the task, replays step 1 from the history, and runs step 2 only.

set -euo pipefail

API=${API:-http://127.0.0.1:8011}
TOKEN=${HARDWAY_API_TOKEN:?set HARDWAY_API_TOKEN to the API token}
WORKER=${WORKER:-sh-$$}  # the name the task's attempts record
WAIT=${WAIT:-30}         # how long a claim waits for a task, in seconds
LEASE=${LEASE:-30}       # how long the task is ours without a heartbeat, in seconds
STOP_AFTER_STEP=${STOP_AFTER_STEP:-}

# post PATH JSON: POST the JSON to the API. The answer's body goes to $BODY, its status to $STATUS.
post() {
    local answer
    answer=$(curl -sS -X POST "$API$1" --data-binary "$2" -w '\n%{http_code}' \
        -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json')
    STATUS=${answer##*$'\n'}
    BODY=${answer%$'\n'*}
}

# attempt ACTION JSON: POST to this attempt's heartbeat, steps, complete or fail.
attempt() {
    post "/worker/tasks/$ID/attempts/$ATTEMPT/$1" "$2"
    case $STATUS in
        2??) ;;
        409) echo "task $ID: attempt $ATTEMPT is over: $(jq -r .error <<<"$BODY")" >&2; exit 3 ;;
        *) echo "$1: HTTP $STATUS: $(jq -r .error <<<"$BODY")" >&2; exit 1 ;;
    esac
}

# step NAME FUNCTION: the durable step NAME. FUNCTION prints the step's result, as JSON. Sets
# RESULT to the result as the log holds it: on a replay, the one recorded then.
SEQ=0
step() {
    SEQ=$((SEQ + 1))
    local recorded output
    recorded=$(jq -c --argjson seq "$SEQ" '.task.history[] | select(.seq == $seq)' <<<"$TASK")
    if [[ -n $recorded ]]; then
        if [[ $(jq -r .name <<<"$recorded") != "$1" ]]; then
            # The code no longer takes the steps its history recorded (a deploy changed it):
            # going on would hand one step's result to another. Fail for good; an operator
            # decides (replay the task from an empty history, or roll the code back).
            attempt fail "$(jq -cn --arg error "step $SEQ is not $1 in the history" \
                '{error: $error, retryable: false}')"
            exit 1
        fi
        echo "replayed step $SEQ ($1)" >&2
        RESULT=$(jq -c .result <<<"$recorded")
        return
    fi
    # Is the attempt still ours? (409, and the script stops.) And the lease starts again: a step
    # that could take longer than the lease would heartbeat from a background loop instead.
    attempt heartbeat "$(jq -cn --argjson lease "$LEASE" '{lease: $lease}')"
    echo "running step $SEQ ($1)" >&2
    if ! output=$("$2"); then
        attempt fail "$(jq -cn --arg error "step $1 failed" '{error: $error}')"
        exit 1
    fi
    attempt steps "$(jq -cn --argjson seq "$SEQ" --arg name "$1" --argjson output "$output" \
        '{seq: $seq, name: $name, output: $output}')"
    RESULT=$(jq -c .event.result <<<"$BODY")
    if [[ $SEQ == "$STOP_AFTER_STEP" ]]; then
        echo "stopping after step $SEQ, as if this worker had crashed" >&2
        exit 0
    fi
}

# The task's two steps. Each prints its result as JSON.
compose() {
    jq -n --arg name "$(jq -r .task.input.name <<<"$TASK")" '"Hello, \($name)!"'
}
deliver() {
    # The side effect: a line on stderr, standing for an email sent.
    echo "delivering: $GREETING" >&2
    jq -n '{delivered_at: (now | todate)}'
}

# 1. Claim.
post /worker/claim "$(jq -cn --arg worker "$WORKER" --argjson wait "$WAIT" \
    --argjson lease "$LEASE" '{worker: $worker, task_names: ["greet"], wait: $wait, lease: $lease}')"
case $STATUS in
    200) ;;
    204) echo "no greet task to run within ${WAIT}s" >&2; exit 0 ;;
    *) echo "claim: HTTP $STATUS: $(jq -r .error <<<"$BODY")" >&2; exit 1 ;;
esac
TASK=$BODY
ID=$(jq -r .task.id <<<"$TASK")
ATTEMPT=$(jq -r .task.attempt <<<"$TASK")
echo "task $ID, attempt $ATTEMPT: $(jq -c .task.input <<<"$TASK")" >&2

# 2. The steps.
step compose compose
GREETING=$(jq -r . <<<"$RESULT")
step deliver deliver
DELIVERY=$RESULT

# 3. Complete.
attempt complete "$(jq -cn --arg greeting "$GREETING" --argjson delivery "$DELIVERY" \
    '{output: {greeting: $greeting, delivery: $delivery}}')"
echo "task $ID completed: $GREETING" >&2
