#!/bin/bash
# Minimal fake `apptainer` for tests/container (not the bubblewrap stand-in).
# State lives in $FAKE_APPTAINER_STATE; every call is appended to $state/calls.
# Knobs (files in the state dir):
#   start_fail            instance start fails (exit 255, FATAL line on stderr)
#   start_sleep           seconds instance start takes
#   start_noshow          instance start succeeds but the instance is never listed
#   list_fail             instance list always fails (exit 3)
#   list_fail_count       instance list fails while this counter (decremented per call) > 0
#   build_fail            build writes a partial output then fails
#   pip_out/dpkg_out/npm_out  output of the matching exec capture (missing npm_out: exit 127)
#   pip_rc/dpkg_rc        exit codes for those captures
state=${FAKE_APPTAINER_STATE:?}
printf '%s\n' "$*" >> "$state/calls"
touch "$state/instances"
case "$1" in
instance)
    case "$2" in
    list)
        if [ -f "$state/list_fail" ]; then echo "FATAL: list broken" >&2; exit 3; fi
        if [ -f "$state/list_fail_count" ]; then
            n=$(cat "$state/list_fail_count")
            if [ "$n" -gt 0 ]; then echo $((n - 1)) > "$state/list_fail_count"; echo "FATAL: transient" >&2; exit 3; fi
        fi
        printf '{\n    "instances": ['
        sep=
        while IFS= read -r n; do
            [ -n "$n" ] || continue
            printf '%s\n        {\n            "instance": "%s",\n            "pid": 4242,\n            "img": "/x.sif"\n        }' "$sep" "$n"
            sep=,
        done < "$state/instances"
        printf '\n    ]\n}\n'
        ;;
    start)
        if [ -f "$state/start_sleep" ]; then sleep "$(cat "$state/start_sleep")"; fi
        if [ -f "$state/start_fail" ]; then
            echo "INFO:    starting" >&2
            printf 'FATAL:   container creation failed:\n   image not found\n' >&2
            exit 255
        fi
        if grep -qxF -- "${!#}" "$state/instances" 2>/dev/null; then
            echo "FATAL:   instance ${!#} already exists" >&2  # as apptainer does
            exit 255
        fi
        [ -f "$state/start_noshow" ] || echo "${!#}" >> "$state/instances"
        echo "INFO:    instance started successfully" >&2
        ;;
    stop)
        grep -vxF -- "$3" "$state/instances" > "$state/instances.new"
        mv "$state/instances.new" "$state/instances"
        ;;
    esac
    ;;
build)
    out=${*: -2:1}
    if [ -f "$state/build_fail" ]; then echo partial > "$out"; echo "FATAL: build failed" >&2; exit 1; fi
    case " $* " in
    *" --sandbox "*) mkdir -p "$out/.singularity.d/env"; echo 'export LANG=C' > "$out/.singularity.d/env/90-environment.sh" ;;
    *) echo "built from ${!#}" > "$out" ;;
    esac
    ;;
exec)
    case " $* " in
    *" pip freeze"*) [ -f "$state/pip_out" ] && cat "$state/pip_out"; exit "$(cat "$state/pip_rc" 2>/dev/null || echo 0)" ;;
    *" dpkg-query "*) [ -f "$state/dpkg_out" ] && cat "$state/dpkg_out"; exit "$(cat "$state/dpkg_rc" 2>/dev/null || echo 0)" ;;
    *" npm list"*) [ -f "$state/npm_out" ] || { echo "npm: not found" >&2; exit 127; }; cat "$state/npm_out" ;;
    *) exit "$(cat "$state/exec_rc" 2>/dev/null || echo 0)" ;;
    esac
    ;;
esac
