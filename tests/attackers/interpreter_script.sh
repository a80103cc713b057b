#!/bin/sh
# Attacker: writes a script the policy allows by path whose #! line names an
# interpreter the policy forbids, then runs the script (not the interpreter).
# Usage: interpreter_script.sh DIR INTERPRETER [MIDDLE]
#   DIR/allowed.sh  '#!INTERPRETER', or with MIDDLE a #! chain:
#   DIR/allowed.sh  '#!DIR/middle.sh', DIR/middle.sh '#!INTERPRETER'.
# Prints what the interpreter ran; exits with the script's status.
set -e
dir=$1 interpreter=$2 middle=${3:-}
if [ -n "$middle" ]; then
    printf '#!%s\necho ran-by-middle "$@"\n' "$interpreter" > "$dir/middle.sh"
    chmod 755 "$dir/middle.sh"
    printf '#!%s\necho ran-by-interpreter\n' "$dir/middle.sh" > "$dir/allowed.sh"
else
    printf '#!%s\necho ran-by-interpreter\n' "$interpreter" > "$dir/allowed.sh"
fi
chmod 755 "$dir/allowed.sh"
exec "$dir/allowed.sh" attack
