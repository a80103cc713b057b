"""Per-agent whitelists: policy files, their validated model, and the decision.

The modules: model (the validated policy and the verdict), glob (rule patterns
compiled to regexes), load (TOML files to a PolicySet), decide (the verdict on
one event), kernel_rules (the denies the BPF program enforces alone). This
docstring is the reference for the file format, the globs and the decision.

Policy files are TOML: by default every ``*.toml`` in /etc/agentwarden/policy.d/,
read in name order. A file holds one or more agents; an agent is defined once
across all files. Example::

    [agent.coder]
    mode = "enforce"          # or "monitor": decide and record, never act
    on-violation = "kill"     # alert | kill | kill-agent | freeze | hold
    hold-timeout = 300        # seconds a held action waits for an admin (default 300)
    hold-approvers = 1        # distinct admins who must approve each hold (default 1)
    change-ttl = "7d"         # an approved change of a tracked file stands this long (optional)

    [agent.coder.exec]        # programs, by the path that actually ran
    allow = ["/usr/bin/git", "/usr/bin/python3*", "/home/coder/venv/bin/*"]
    hold  = ["/usr/bin/git * push *"]   # executable glob, then an argv pattern
    deny  = ["/usr/bin/curl", "/usr/bin/wget"]

    [agent.coder.files]       # opens and file changes; write-allow also allows reading
    read-allow  = ["/usr/**", "/etc/ld.so.cache", "/home/coder/**"]
    write-allow = ["/home/coder/work/**", "/tmp/*"]
    deny        = ["/home/coder/.ssh/**"]
    track       = ["/etc/**"]  # files whose changes drift keeps; decides nothing (default /etc/**)

    [agent.coder.syscalls]    # side doors the agent may use (default: none)
    allow = ["unshare"]       # io_uring, open_by_handle, unshare, setns, mount, chroot, pivot_root

``mode`` and ``on-violation`` are required; an agent needs at least one rule.

Globs are absolute and match normalised paths, lexically: ``*`` matches within
one path component, ``?`` one character, ``[a-z]``/``[!a-z]`` one character of
a class, and ``**`` -- only as a whole component -- zero or more components:
``/src/**`` is /src and everything below it, ``/src/**/*.py`` every .py file
at any depth below /src. Matching is lexical (symlinks are not followed here);
the daemon also judges where a path really leads and the more severe verdict
stands (docs/policy.md, "Symlinks").

An exec rule is split into words like a shell line (quote a path with spaces).
The first word is the executable glob; the rest, if any, is an argv pattern
matched against argv[1:] (argv[0] is the caller's to choose). Each word matches
one argument (``*``, ``?`` and ``[...]`` work inside it, ``/`` included); a
word that is only ``*`` stands for any number of arguments, none included. The
pattern is positional: ``/usr/bin/git * push *`` holds ``git push``,
``git -C repo push origin``, and also ``git commit -m push``.

How `decide` works:

- Precedence: deny beats hold beats allow; whatever no rule allows is a
  violation (a whitelist). The verdict names the deciding rule with file:line.
  Files have no hold rules. A violation carries the agent's ``on-violation``
  action; a deny carries none: a rule forbids the action outright.
- An exec is judged by ``resolved_exec_path``, what the kernel actually ran.
  Only when the kernel reported nothing (the exec failed or was not seen) is
  ``resolved_filename``, the path asked for, used instead; the reason says so.
- An open is a write when its flags ask for write access or O_CREAT, O_TRUNC or
  O_APPEND; otherwise it is a read.
- A file change (unlink, rmdir, rename, truncate, chmod, chown, link,
  symlink, mkdir and their *at and f* forms) is a write of every path it
  changes: both names of a rename or link, the link (not its target) of a
  symlink, the fd's path for ftruncate, fchmod and fchown. Each must be
  allowed by files.write-allow and not denied; the most severe verdict stands.
  An fd call through a descriptor the agent opened for writing is allowed: its
  open was judged as a write of the same path (in a session, by the
  supervisor, perhaps with an admin's approval).
- A side door (io_uring_setup; open_by_handle_at; unshare and clone with new
  namespaces; setns; mount and the new mount API; chroot; pivot_root) is a
  violation unless [agent.NAME.syscalls] allow names it.
- Failed calls (ret < 0) are decided like successful ones: an attempt is an
  attempt.
- A path the daemon could not resolve (None) matches no rule, so it is always a
  violation.
- Running the dynamic loader as the program (``ld-linux*.so* /usr/bin/curl``)
  or a program from a file descriptor (``/dev/fd/N``, ``/proc/PID/fd/N``,
  ``/memfd:NAME``) is allowed only by an allow rule whose executable glob
  itself has that shape (``/lib64/ld-linux-x86-64.so.2``, ``/dev/fd/*``), not by
  a broad one such as ``/**``. Deny and hold rules apply as usual.
- When the kernel cut argv short, argv patterns cannot be checked: deny and hold
  rules with an argv pattern match on their executable alone, allow rules with
  one do not match.
- A move of an agent's process out of the agent's cgroups (``move`` records with
  ``left``) is a violation, whatever the rules: once an agent, always an agent.
  A move within them is allowed.
- An event of an agent without a policy is a violation in monitor mode with
  the action alert: it is recorded, never acted on.

Each loaded policy set has a hash, sha256 of its canonical content (agents,
settings and sorted rules; not formatting, comments or file layout), which
every verdict carries.
"""
from __future__ import annotations

from .decide import CHANGE_SYSCALLS, EXEC_PRECEDENCE, FILE_PRECEDENCE, changed_paths, decide, is_write
# The glob token kinds: what Rule.path_parts and Rule.argv_parts are made of.
from .glob import ANY, CHAR, CLASS, ONE, GlobError
from .kernel_rules import KernelRule, kernel_deny_rules, kernel_kill_agents, kernel_sidedoors
from .load import load_policy
from .model import (ACTIONS, DEFAULT_HOLD_TIMEOUT, MODES, RULE_LISTS, SIDEDOORS, AgentPolicy, PolicyError,
                    PolicySet, Problem, Rule, RuleList, Verdict)

__all__ = ["ACTIONS", "ANY", "CHANGE_SYSCALLS", "CHAR", "CLASS", "DEFAULT_HOLD_TIMEOUT", "EXEC_PRECEDENCE",
           "FILE_PRECEDENCE", "MODES", "ONE", "RULE_LISTS", "SIDEDOORS", "AgentPolicy", "GlobError", "KernelRule",
           "PolicyError", "PolicySet", "Problem", "Rule", "RuleList", "Verdict", "changed_paths", "decide",
           "is_write", "kernel_deny_rules", "kernel_kill_agents", "kernel_sidedoors", "load_policy"]
