"""The local launcher's machinery: spawning ranks, simulated nodes, the progress watchdog, attempts and restarts."""
