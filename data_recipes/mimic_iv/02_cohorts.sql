-- Task cohorts, labels and the attrition of each task (definitions: README.md in this folder).
-- Inputs: adm, src_icustays. Outputs: icu, cohort, task_windows (task, ids, prediction time t_pred, label).

CREATE OR REPLACE TABLE icu AS
SELECT
    i.subject_id, i.hadm_id, i.stay_id,
    TRY_CAST(i.intime AS TIMESTAMP) AS intime,
    TRY_CAST(i.outtime AS TIMESTAMP) AS outtime,
    TRY_CAST(i.intime AS TIMESTAMP) IS NULL AS bad_intime,
    (i.outtime IS NOT NULL AND TRY_CAST(i.outtime AS TIMESTAMP) IS NULL) AS bad_outtime,
    a.hadm_id IS NULL AS unknown_hadm
FROM src_icustays i
LEFT JOIN adm a ON a.hadm_id = i.hadm_id;

INSERT INTO attrition
SELECT 'input', 3, 'icu/icustays', count(*),
    count(*) FILTER (WHERE bad_intime OR bad_outtime OR unknown_hadm),
    count(*) FILTER (WHERE NOT (bad_intime OR bad_outtime OR unknown_hadm)),
    printf('%d missing or unparsable intime (their admissions are left out of critical_24h); '
           '%d unparsable outtime; %d hadm_id not among the usable admissions',
        count(*) FILTER (WHERE bad_intime AND NOT unknown_hadm), count(*) FILTER (WHERE bad_outtime),
        count(*) FILTER (WHERE unknown_hadm))
FROM icu;

CREATE OR REPLACE TABLE cohort AS
WITH icu_flags AS (
    SELECT a.hadm_id,
        bool_or(i.bad_intime) AS icu_malformed,
        bool_or(i.intime <= a.admittime + INTERVAL 24 HOUR) AS icu_by_t0,
        bool_or(i.intime > a.admittime + INTERVAL 24 HOUR AND i.intime <= a.dischtime) AS icu_after_t0
    FROM adm a JOIN icu i ON i.hadm_id = a.hadm_id
    GROUP BY a.hadm_id
), readmit AS (
    -- "another admission" of the subject: the index itself never counts, even with odd times
    SELECT a.hadm_id,
        bool_or(b.admittime > a.dischtime AND b.admittime <= a.dischtime + INTERVAL 30 DAY) AS readmitted
    FROM adm a JOIN adm b ON b.subject_id = a.subject_id AND b.hadm_id <> a.hadm_id
    WHERE a.dischtime IS NOT NULL
    GROUP BY a.hadm_id
)
SELECT a.*,
    a.admittime + INTERVAL 24 HOUR AS t0,
    coalesce(r.readmitted, false) AS readmitted,
    coalesce(f.icu_malformed, false) AS icu_malformed,
    coalesce(f.icu_by_t0, false) AS icu_by_t0,
    coalesce(f.icu_after_t0, false) AS icu_after_t0
FROM adm a
LEFT JOIN readmit r ON r.hadm_id = a.hadm_id
LEFT JOIN icu_flags f ON f.hadm_id = a.hadm_id;

-- Attrition: each step's n_before is the previous step's n_after.
INSERT INTO attrition
WITH raw AS (SELECT count(*) AS n FROM adm_parsed),
s AS (
    SELECT count(*) AS n0,
        count(*) FILTER (WHERE hospital_expire_flag = 0) AS n1,
        count(*) FILTER (WHERE hospital_expire_flag = 0 AND dischtime IS NOT NULL) AS n2
    FROM cohort
)
SELECT 'readmission_30d', 1, 'malformed_admission', raw.n, raw.n - n0, n0,
    'malformed hosp/admissions rows (see the input row)' FROM raw, s
UNION ALL SELECT 'readmission_30d', 2, 'in_hospital_death', n0, n0 - n1, n1,
    'hospital_expire_flag is not 0 (died in hospital, or flag missing)' FROM s
UNION ALL SELECT 'readmission_30d', 3, 'missing_dischtime', n1, n1 - n2, n2, 'dischtime is null' FROM s;

INSERT INTO attrition
WITH raw AS (SELECT count(*) AS n FROM adm_parsed),
s AS (
    SELECT count(*) AS n0,
        count(*) FILTER (WHERE c1) AS n1,
        count(*) FILTER (WHERE c1 AND c2) AS n2,
        count(*) FILTER (WHERE c1 AND c2 AND c3) AS n3,
        count(*) FILTER (WHERE c1 AND c2 AND c3 AND c4) AS n4
    FROM (
        SELECT coalesce(dischtime > t0, false) AS c1,
            deathtime IS NULL OR deathtime > t0 AS c2,
            NOT icu_malformed AS c3,
            NOT icu_by_t0 AS c4
        FROM cohort
    )
)
SELECT 'critical_24h', 1, 'malformed_admission', raw.n, raw.n - n0, n0,
    'malformed hosp/admissions rows (see the input row)' FROM raw, s
UNION ALL SELECT 'critical_24h', 2, 'discharged_by_t0', n0, n0 - n1, n1,
    'dischtime null or at/before t0 = admittime + 24 h' FROM s
UNION ALL SELECT 'critical_24h', 3, 'died_by_t0', n1, n1 - n2, n2, 'deathtime at or before t0' FROM s
UNION ALL SELECT 'critical_24h', 4, 'malformed_icu_stay', n2, n2 - n3, n3,
    'an ICU stay of the admission has a missing or unparsable intime' FROM s
UNION ALL SELECT 'critical_24h', 5, 'icu_by_t0', n3, n3 - n4, n4, 'an ICU stay starts at or before t0' FROM s;

-- One row per (task, index admission): the prediction time t_pred bounds every feature.
CREATE OR REPLACE TABLE task_windows AS
SELECT 'readmission_30d' AS task, subject_id, hadm_id, admittime, dischtime, win_start,
    dischtime AS t_pred, readmitted::INTEGER AS label
FROM cohort
WHERE hospital_expire_flag = 0 AND dischtime IS NOT NULL
UNION ALL
SELECT 'critical_24h', subject_id, hadm_id, admittime, dischtime, win_start,
    t0 AS t_pred, (coalesce(hospital_expire_flag = 1, false) OR icu_after_t0)::INTEGER AS label
FROM cohort
WHERE dischtime > t0 AND (deathtime IS NULL OR deathtime > t0) AND NOT icu_malformed AND NOT icu_by_t0;
