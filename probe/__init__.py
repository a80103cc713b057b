"""The probe: loads the BPF program, mirrors agent tags into it, decodes its
records and streams them to the daemon. No policy here."""
