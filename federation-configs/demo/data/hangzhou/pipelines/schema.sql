-- Hangzhou's three departments' pipeline tables (SYNTHETIC data, see scripts/build_pipelines_data.py).
-- One database per department; `fedgate demo` creates them on a local PostgreSQL server
-- and loads the CSV file named after each table. The power department's database is
-- MariaDB: see schema.mysql.sql.
-- database: hz_water
CREATE TABLE public.water_mains (
  pipe_no text PRIMARY KEY, district_code int4 NOT NULL, road text, diameter_mm int4,
  material text, length_m float8, laid_on date, depth_m numeric(5,2), status_code char(1));
-- database: hz_gas
CREATE SCHEMA gis;
CREATE TABLE gis.gas_lines (
  id int8 PRIMARY KEY, qx_dm text NOT NULL, street text, dn int4, pressure text,
  length_m float8, laid_on date, state text, inspected_at timestamptz);
