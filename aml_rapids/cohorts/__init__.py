"""Cohorts: drift between a reference cohort's store and a new cohort's, and the colour of their cells."""
