-- Hangzhou's power department keeps its cable ducts in MariaDB (SYNTHETIC data, see
-- scripts/build_pipelines_data.py). `fedgate demo` creates the database on a local
-- MariaDB server and loads the CSV file named after the table (`t`/`f` into BOOLEAN,
-- empty fields as NULL).
-- database: hz_power
CREATE TABLE cable_ducts (
  duct_id varchar(16) PRIMARY KEY, area varchar(32), road_name varchar(64),
  voltage_kv decimal(6,1), duct_width_mm int, length_m double, commissioned date,
  retired boolean) CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin;
