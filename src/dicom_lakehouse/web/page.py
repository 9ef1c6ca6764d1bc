"""The service's own study list at `/`: a plain page that asks QIDO-RS for the studies and WADO-RS
for each study's thumbnail, as any DICOMweb viewer would."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dicom-lakehouse studies</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 1.5em; background: #111; color: #ddd; }
table { border-collapse: collapse; } td, th { padding: .4em .8em; border-bottom: 1px solid #333; text-align: left; }
img { width: 96px; height: 96px; object-fit: contain; background: #000; }
</style></head>
<body><h1>Studies</h1><p id="status">loading&hellip;</p>
<table id="studies"><thead><tr><th></th><th>Patient</th><th>Date</th><th>Modalities</th><th>Description</th>
<th>Series</th><th>Instances</th></tr></thead><tbody></tbody></table>
<script>
const root = "/dicomweb";
const v = (o, tag) => { const e = o[tag]; if (!e || !e.Value) return "";
  const x = e.Value; return x.map(y => (y && y.Alphabetic) ? y.Alphabetic : y).join(", "); };
fetch(root + "/studies?includefield=00081030", {headers: {Accept: "application/dicom+json"}})
  .then(r => r.status === 204 ? [] : r.json())
  .then(studies => {
    const body = document.querySelector("#studies tbody");
    let loaded = 0;
    for (const s of studies) {
      const uid = v(s, "0020000D");
      const tr = document.createElement("tr");
      tr.className = "study";
      tr.dataset.uid = uid;
      const img = document.createElement("img");
      img.alt = "thumbnail";
      img.onload = () => { loaded += 1; document.body.dataset.loaded = loaded + "/" + studies.length; };
      img.src = root + "/studies/" + uid + "/thumbnail";
      const td = document.createElement("td"); td.appendChild(img); tr.appendChild(td);
      for (const tag of ["00100010", "00080020", "00080061", "00081030", "00201206", "00201208"]) {
        const c = document.createElement("td"); c.textContent = v(s, tag); tr.appendChild(c);
      }
      body.appendChild(tr);
    }
    document.querySelector("#status").textContent = studies.length + " studies";
  })
  .catch(e => { document.querySelector("#status").textContent = "error: " + e; });
</script></body></html>
"""
