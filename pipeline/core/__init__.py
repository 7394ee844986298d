"""What every part of layertap stands on: errors, the running backend and machine, settings fields,
evaluation, thread helpers."""
