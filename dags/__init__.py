"""The Airflow DAGs (wiring only). A package so an installed `rpm` finds them; nothing imports it but Airflow."""
