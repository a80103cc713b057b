"""Deny rules the BPF program can enforce alone, killing in the kernel."""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass

from .glob import WILDCARD
from .model import AgentPolicy, PolicySet


@dataclass(frozen=True)
class KernelRule:
    """A deny the BPF program enforces itself: an exact absolute path, or
    every path under a directory (``path`` then ends in '/')."""
    agent: str
    path: str
    exact: bool
    applies: str           # "exec" or "open"
    rule: str              # the policy rule, with file:line


KERNEL_PATH_MAX = 251      # bytes; the BPF trie holds 252 with the NUL
# Killing the process in the kernel is what these actions ask for (at least).
KERNEL_KILL_ACTIONS = ("kill", "kill-agent")


def kills_in_kernel(agent: AgentPolicy) -> bool:
    """Whether the kernel may kill this agent's processes itself: enforce mode,
    and violations that kill."""
    return agent.mode == "enforce" and agent.on_violation in KERNEL_KILL_ACTIONS


def kernel_kill_agents(policy: PolicySet) -> list[str]:
    """The agents whose processes the kernel kills when they leave the agent's
    cgroups (that is a violation like any other)."""
    return sorted(agent.name for agent in policy.agents.values() if kills_in_kernel(agent))


def kernel_deny_rules(policy: PolicySet) -> list[KernelRule]:
    """Deny rules of enforcing agents whose violations kill, that are a literal
    path or a literal directory followed by '/**' (and, for exec, have no argv
    pattern). Monitor agents get none: monitor mode never acts. Everything else is left to the
    daemon, which also backs these up for relative or unusual spellings."""
    found: list[KernelRule] = []
    for agent in policy.agents.values():
        if not kills_in_kernel(agent):
            continue
        for kind, applies in (("exec.deny", "exec"), ("files.deny", "open")):
            for rule in agent.rules[kind].rules:
                words = shlex.split(rule.pattern) if applies == "exec" else [rule.pattern]
                if len(words) != 1 or "\\" in words[0]:
                    continue
                glob = words[0]
                if not WILDCARD.search(glob):
                    candidates = [(glob, True)]
                elif glob.endswith("/**") and not WILDCARD.search(glob[:-3]):
                    base = glob[:-3]
                    candidates = [(base or "/", True), (base + "/", False)]
                else:
                    continue
                for path, exact in candidates:
                    if len(os.fsencode(path)) <= KERNEL_PATH_MAX:
                        found.append(KernelRule(agent.name, path, exact, applies, str(rule)))
    return found


def kernel_sidedoors(policy: PolicySet) -> dict[str, list[str]]:
    """Agent -> the side doors its policy allows, for the agents the kernel
    kills at any other (enforcing, violations kill); the rest are only
    recorded and left to the daemon."""
    return {agent.name: sorted(agent.syscalls) for agent in policy.agents.values()
            if agent.mode == "enforce" and agent.on_violation in KERNEL_KILL_ACTIONS}
