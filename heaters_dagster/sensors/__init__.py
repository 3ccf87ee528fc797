"""Sensors replace the old dispatcher: built from the stage table, they watch Postgres state."""
