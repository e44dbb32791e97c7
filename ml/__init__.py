"""driftloop: the library. Knows nothing of Airflow or BentoML."""
