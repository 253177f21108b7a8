-- Labs (hosp/labevents) and, when the optional table exists, vital signs (icu/chartevents): first, last,
-- min, max, mean and count of each catalogued quantity (features.LABS / features.VITALS) in the window.
-- Inputs: src_labevents, src_chartevents (empty when absent), adm, task_windows,
-- meas_items (fid, itemid, feature, source). Output: meas_feats.
--
-- Linkage: a row belongs to an admission when its hadm_id is that admission's, or, when its hadm_id is
-- empty (outpatient and some ED draws), when the same subject's charttime falls in
-- [win_start, t_pred] (win_start = ED registration, else admittime). Either way only rows charted at or
-- before the prediction time count. Big tables are scanned once: the catalogue rows are kept, then
-- aggregated per (task, admission, quantity) in one GROUP BY, then pivoted to columns.

CREATE OR REPLACE TABLE meas AS
WITH raw AS (
    SELECT l.subject_id, l.hadm_id, l.itemid, l.charttime, l.valuenum FROM src_labevents l
    UNION ALL
    SELECT c.subject_id, c.hadm_id, c.itemid, c.charttime, c.valuenum FROM src_chartevents c
)
SELECT m.fid, m.source, r.subject_id, r.hadm_id,
    TRY_CAST(r.charttime AS TIMESTAMP) AS charttime,
    TRY_CAST(r.valuenum AS DOUBLE) AS valuenum,
    TRY_CAST(r.charttime AS TIMESTAMP) IS NULL AS bad_time,
    (r.valuenum IS NOT NULL AND TRY_CAST(r.valuenum AS DOUBLE) IS NULL) AS bad_value
FROM raw r
JOIN meas_items m ON m.itemid = r.itemid;

-- Rows whose hadm_id is not a usable admission never link (below); they are counted here.
INSERT INTO attrition
SELECT 'input', 7 + (s.source <> 'hosp/labevents')::INTEGER, s.source || ' (catalogued itemids)', count(m.fid),
    count(m.fid) FILTER (WHERE m.bad_time OR m.bad_value OR m.unknown_hadm OR m.valuenum IS NULL),
    count(m.fid) FILTER (WHERE NOT (m.bad_time OR m.bad_value OR m.unknown_hadm OR m.valuenum IS NULL)),
    printf('malformed: %d missing or unparsable charttime; %d unparsable valuenum; '
           '%d hadm_id not among the usable admissions. Not malformed but unused: %d without valuenum',
        count(m.fid) FILTER (WHERE m.bad_time),
        count(m.fid) FILTER (WHERE m.bad_value AND NOT m.bad_time),
        count(m.fid) FILTER (WHERE m.unknown_hadm AND NOT (m.bad_time OR m.bad_value)),
        count(m.fid) FILTER (WHERE m.valuenum IS NULL AND NOT (m.bad_time OR m.bad_value OR m.unknown_hadm)))
FROM (SELECT DISTINCT source FROM meas_items) s
LEFT JOIN (
    SELECT x.*, (x.hadm_id IS NOT NULL AND a.hadm_id IS NULL) AS unknown_hadm
    FROM meas x LEFT JOIN adm a ON a.hadm_id = x.hadm_id
) m ON m.source = s.source
GROUP BY s.source;

CREATE OR REPLACE TABLE meas_agg AS
WITH usable AS (
    SELECT fid, subject_id, hadm_id, charttime, valuenum FROM meas
    WHERE NOT (bad_time OR bad_value) AND valuenum IS NOT NULL
), linked AS (
    SELECT w.task, w.hadm_id, u.fid, u.charttime, u.valuenum
    FROM usable u JOIN task_windows w ON w.hadm_id = u.hadm_id
    WHERE u.charttime <= w.t_pred
    UNION ALL
    SELECT w.task, w.hadm_id, u.fid, u.charttime, u.valuenum
    FROM usable u JOIN task_windows w ON w.subject_id = u.subject_id
    WHERE u.hadm_id IS NULL AND u.charttime >= w.win_start AND u.charttime <= w.t_pred
)
-- Ties in time are broken by value so that first/last are deterministic.
SELECT task, hadm_id, fid, count(*) AS n,
    avg(valuenum) AS v_mean, min(valuenum) AS v_min, max(valuenum) AS v_max,
    arg_min(valuenum, row(charttime, valuenum)) AS v_first,
    arg_max(valuenum, row(charttime, valuenum)) AS v_last
FROM linked
GROUP BY task, hadm_id, fid;

-- Wide: one column per (quantity, statistic); count is 0, the others NULL, when never measured.
CREATE OR REPLACE TABLE meas_feats AS
SELECT w.task, w.hadm_id,
    {{measurement_columns}}
FROM task_windows w
{{measurement_joins}};
