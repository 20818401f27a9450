"""The triage worklist: SQLAlchemy models, the job queue, the study list, migrations.

The database is the queue: one row per received SOP instance, claimed with a lease.
"""
