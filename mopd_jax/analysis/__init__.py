"""Offline analysis of saved rollouts: teacher-signal alignment and diversity."""
