"""Sessions of `agentwarden run`: their seccomp listeners, and the holds admins answer.

Runs as its own process (`python -m agentwarden.daemon.supervisor`), a child
of the daemon (it dies with it). The listeners outlive both: each is kept in
the service manager's fd store (systemd's, or `agentwarden up`'s), so a
restarted daemon resumes its sessions (restart.py); only a real stop of the
service closes them, and then held and later notified calls fail. A separate process, not a thread, so that the daemon's
event processing never holds the interpreter while a syscall waits. Its
records (sessions, holds, refusals, its health) go to the daemon's ingest
socket like the probe's, as source "supervisor". One UNIX seqpacket socket
serves both sides, with the peer's credentials from the kernel (SO_PEERCRED):
`run` registers a session and hands over its listener fd; admins list,
approve and deny holds.

For every notification: read the arguments from /proc/PID/mem, check the
notification is still valid, decide with the policy, and then continue, fail
with EPERM, or hold. A compiled thread (fastpath.c) receives first and
answers alone the execs and write-opens that the agent's compiled rules allow
(no deny or hold rule matching), or that this process already allowed under
the current policy; it forwards the rest here unanswered. A continued exec is
first written to the BPF map `approved_exec`, so the kernel kills it at
sched_process_exec if what runs is not what was checked. Whatever cannot be
read or checked is refused.

The modules:
  __main__   the process: arguments, dying with the daemon, signals
  loop       Supervisor: the wait loop, a notification from receipt to answer, policy reloads, health
  listeners  the sessions by listener fd, and the epoll set of every fd waited on
  reader     what a notified syscall asks for, read from the task (Request)
  decisions  verdicts, cached per policy, and the approvals admins asked to remember
  approvals  exec approvals in the probe's pinned maps, and letting a call through
  holds      calls waiting for admins, their answers and deadlines
  context    what an approver sees of a hold: ancestry, the agent's claim, files, hashes, diffs
  tell       one line on a held task's own stderr
  admin      the socket: session registration, the holds admins list, show, approve and deny
  records    what goes to the daemon's ingest socket, and the counters health reports
  restart    what outlives this process (fd store, state_dir/sessions, receipts), and resuming
"""
