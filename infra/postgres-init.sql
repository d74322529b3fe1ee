-- The compose file's PostgreSQL holds two databases: `mlflow` (created by POSTGRES_DB) and this one.
CREATE DATABASE prefect;
