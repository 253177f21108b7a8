-- Procedure counts. Inputs: src_procedures_icd, adm, task_windows. Output: proc_feats.
-- chartdate has no time of day, so a procedure counts once its whole day has passed by t_pred; at
-- discharge (readmission_30d: t_pred = dischtime) every coded procedure of the stay is final and counts.

CREATE OR REPLACE TABLE px AS
SELECT p.hadm_id, TRY_CAST(p.chartdate AS DATE) AS chartdate,
    a.hadm_id IS NULL AS unknown_hadm,
    (p.chartdate IS NOT NULL AND TRY_CAST(p.chartdate AS DATE) IS NULL) AS bad_date
FROM src_procedures_icd p
LEFT JOIN adm a ON a.hadm_id = p.hadm_id;

INSERT INTO attrition
SELECT 'input', 5, 'hosp/procedures_icd', count(*),
    count(*) FILTER (WHERE unknown_hadm OR bad_date),
    count(*) FILTER (WHERE NOT (unknown_hadm OR bad_date)),
    printf('%d hadm_id not among the usable admissions; %d unparsable chartdate',
        count(*) FILTER (WHERE unknown_hadm), count(*) FILTER (WHERE bad_date AND NOT unknown_hadm))
FROM px;

CREATE OR REPLACE TABLE proc_feats AS
SELECT w.task, w.hadm_id, count(p.hadm_id) AS n_procedures
FROM task_windows w
LEFT JOIN px p ON p.hadm_id = w.hadm_id AND NOT p.bad_date
    AND (w.t_pred >= w.dischtime OR CAST(p.chartdate AS TIMESTAMP) + INTERVAL 1 DAY <= w.t_pred)
GROUP BY w.task, w.hadm_id;
