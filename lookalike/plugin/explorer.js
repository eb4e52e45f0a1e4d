// Lookalike in Orthanc Explorer: on a study's page, the most similar other studies, each beside the image of this
// study it matched, and one click to file the answer into this study as an SR.
//
// Safety rule: everything the panel shows and does belongs to one study, `shown`, the study on screen. It is set
// whenever Orthanc Explorer shows a study (page change, link, back button); an answer that arrives for another
// study is dropped, and no button acts while Orthanc Explorer is still drawing another study than `shown`.
(function() {
  var LIMIT = 10;
  var shown = null;     // Orthanc id of the study on screen, which the panel belongs to
  var generation = 0;   // bumped whenever `shown` changes: replies to older requests are dropped

  var panel = $('<div>').attr('id', 'lookalike-panel');
  var scopeName = 'lookalike-scope';
  var scopes = $('<fieldset>').attr('data-role', 'controlgroup').attr('data-type', 'horizontal')
    .attr('id', 'lookalike-scopes')
    .append($('<legend>').text('Search'));
  $.each([['archive', 'All patients'], ['patient', "This patient's earlier studies"]], function(i, s) {
    var id = 'lookalike-scope-' + s[0];
    scopes.append($('<input>').attr({ type: 'radio', name: scopeName, id: id, value: s[0] })
      .prop('checked', i == 0));
    scopes.append($('<label>').attr('for', id).text(s[1]));
  });
  var find = $('<a>').attr({ 'data-role': 'button', href: '#', 'data-icon': 'search', 'data-inline': 'true',
    id: 'lookalike-find' }).text('Similar studies (Lookalike)');
  var report = $('<a>').attr({ 'data-role': 'button', href: '#', 'data-icon': 'plus', 'data-inline': 'true',
    id: 'lookalike-report' }).text('Similar studies as SR (Lookalike)');
  var kos = $('<a>').attr({ 'data-role': 'button', href: '#', 'data-icon': 'star', 'data-inline': 'true',
    id: 'lookalike-kos' }).text("This patient's similar earlier studies as key images (Lookalike)");
  var status = $('<p>').attr('id', 'lookalike-status');
  // Orthanc Explorer's page clips what is wider than the window (overflow-x: hidden): the results scroll
  // sideways in their own box instead, so that every column stays reachable on a narrow screen.
  var results = $('<div>').attr('id', 'lookalike-results').css({ 'overflow-x': 'auto', 'max-width': '100%' });
  panel.append($('<h3>').text('Similar studies (Lookalike)'), scopes, find, report, kos, status, results);

  function pageStudy() {
    var d = $.mobile.pageData;
    return d && d.active == 'study' && d.uuid ? d.uuid : null;
  }

  // Orthanc Explorer sets `currentUuid` once it has drawn a study: until then the screen shows the previous one.
  function drawn(study) {
    return typeof currentUuid === 'undefined' || currentUuid == study;
  }

  // Drop what the panel shows, and the answers still on their way.
  function reset() {
    generation++;
    results.empty().removeAttr('data-answered');
    status.empty();
  }

  function bind() {
    var study = pageStudy();
    if (study === shown) return;
    shown = study;
    reset();
  }

  function scope() { return $('input[name=' + scopeName + ']:checked').val() || 'archive'; }

  function say(text, link) {
    status.empty().text(text);
    if (link) status.append(' ', link);
  }

  function failure(forGeneration) {
    return function(xhr) {
      if (forGeneration !== generation) return;
      var msg = xhr.status + ' ' + xhr.statusText;
      try { var b = JSON.parse(xhr.responseText); msg = b.error + (b.reason ? ': ' + b.reason : ''); } catch (e) {}
      say('Lookalike: ' + msg);
    };
  }

  // The study the buttons may act on now, or null (with the reason on screen).
  function actionableStudy() {
    bind();
    if (!shown) return null;
    if (!drawn(shown)) { say('The study is still loading; try again in a moment.'); return null; }
    return shown;
  }

  // An instance's preview, with the lesion its vector was made from outlined. The box is in the image's stored
  // pixels, the grid Orthanc's preview is drawn on, so it scales with the picture as shown.
  function preview(instance, alt, box) {
    if (!instance) return $('<span>').text('(no image)');
    var frame = $('<span>').addClass('lookalike-image').css({ position: 'relative', display: 'inline-block' });
    var img = $('<img>').attr({ src: '../instances/' + instance + '/preview', alt: alt })
      .css({ 'max-width': '192px', 'max-height': '128px', background: '#000', display: 'block' });
    frame.append(img);
    if (!box) return frame;
    var outline = $('<span>').addClass('lookalike-lesion').attr('title', 'lesion the match was made from (confidence ' +
      box[4].toFixed(2) + ')').css({ position: 'absolute', border: '2px solid #ffd400', 'box-sizing': 'border-box',
      'pointer-events': 'none', display: 'none' });
    frame.append(outline);
    img.bind('load', function() {
      var sx = this.clientWidth / this.naturalWidth, sy = this.clientHeight / this.naturalHeight;
      outline.css({ left: box[0] * sx, top: box[1] * sy, width: (box[2] - box[0]) * sx,
        height: (box[3] - box[1]) * sy, display: 'block' });
    });
    return frame;
  }

  // "1 study", "2 studies": the count and its noun, agreed.
  function count(n, one, many) { return n + ' ' + (n == 1 ? one : many); }

  // The similarity floors the answer applied, as "0.0517 (us-...)"; '' when no model of the answer has one.
  function floorsText(floors) {
    var parts = [];
    $.each(floors || {}, function(version, floor) {
      if (floor !== null && floor !== undefined) parts.push(floor.toFixed(4) + ' (' + version + ')');
    });
    return parts.join(', ');
  }

  function formatDate(d) {
    return d && d.length == 8 ? d.substr(0, 4) + '-' + d.substr(4, 2) + '-' + d.substr(6, 2) : (d || '');
  }

  function show(answer) {
    results.empty().attr('data-answered', answer.study);
    var patient = answer.scope == 'patient', floors = floorsText(answer.floors);
    var below = floors ? ' Studies scoring below the similarity floor of ' + floors + ' are not listed: below it' +
      ' a match shares the finding no more often than chance.' : '';
    if (answer.similar.length == 0) {
      say('No similar study found' + (patient ? " among this patient's earlier studies." : '.') + below);
      return;
    }
    var n = answer.similar.length;
    say(count(n, 'similar study', 'most similar studies') + (patient ? " among this patient's earlier studies" :
      ' of all patients') + '; the score is the cosine similarity of the best-matching image pair' +
      (answer.similar.some(function(s) { return s.best_match.lesion_box; }) ?
        ', outlined in yellow: the lesion each image was matched on.' : '.') + below);
    var disclosed = answer.similar.some(function(s) { return 'patient_id' in s; });
    var head = $('<tr>').append($('<th>').text('#'), $('<th>').text('This study'), $('<th>').text('Similar study'),
      $('<th>').text('Score'), $('<th>').text('Date'), $('<th>').text('Modality'), $('<th>').text('Patient'),
      $('<th>'));
    var table = $('<table>').addClass('lookalike-table').css({ 'border-spacing': '8px 4px' }).append(head);
    $.each(answer.similar, function(i, s) {
      var patient = s.same_patient ? 'this patient' : (disclosed ? s.patient_id + ' ' + (s.patient_name || '')
        : 'another patient');
      var open = $('<a>').addClass('lookalike-open').attr({ href: 'explorer.html#study?uuid=' + s.orthanc_study_id,
        'data-ajax': 'false', title: s.modality + ' study ' + s.study_instance_uid }).text('Open study');
      table.append($('<tr>').addClass('lookalike-result').attr('data-study', s.orthanc_study_id).append(
        $('<td>').addClass('lookalike-rank').text(s.rank),
        $('<td>').append(preview(s.best_match.query_orthanc_instance_id, 'matched image of this study',
          s.best_match.query_lesion_box)),
        $('<td>').append(preview(s.best_match.orthanc_instance_id, 'best-matching image of study #' + s.rank,
          s.best_match.lesion_box)),
        $('<td>').addClass('lookalike-score').text(s.score.toFixed(4)),
        $('<td>').text(formatDate(s.study_date)),
        $('<td>').text(s.modality),
        $('<td>').addClass('lookalike-patient').text(patient),
        $('<td>').append(open)));
    });
    results.append(table);
  }

  find.click(function(e) {
    e.preventDefault();
    var study = actionableStudy(), mine = generation;
    if (!study) return;
    say('Looking up…');
    $.ajax({ url: '../lookalike/studies/' + study + '/similar', data: { limit: LIMIT, scope: scope() },
      dataType: 'json', cache: false,
      success: function(r) {
        if (mine !== generation || r.study !== shown) return;  // the page has moved on to another study
        show(r);
      }, error: failure(mine) });
  });

  // Files a document (SR or KOS) into the study on screen and says where it went.
  function file(route, body, what) {
    var study = actionableStudy(), mine = generation;
    if (!study) return;
    say('Filing the ' + what + '…');
    $.ajax({ url: '../lookalike/studies/' + study + '/' + route, type: 'POST', dataType: 'json',
      contentType: 'application/json', data: JSON.stringify(body),
      success: function(r) {
        if (mine !== generation || r.study !== shown) return;
        if (!r.report) { say("No similar earlier study of this patient found: no key images to select."); return; }
        var when = formatDate(r.series_date) + ' ' + (r.series_time || '').substr(0, 2) + ':' +
          (r.series_time || '').substr(2, 2);
        var link = $('<a>').addClass('lookalike-report-link').attr({ href: 'explorer.html#series?uuid=' + r.series,
          'data-ajax': 'false' }).text('series "' + r.series_description + '" of this study');
        var copies = !r.documents || r.documents.length < 2 ? '' : r.documents.length == 2 ?
          ' (and a copy in the earlier study)' : ' (and a copy in each of the ' + (r.documents.length - 1) +
          ' earlier studies)';
        var listed = r.scope == 'patient' ? count(r.similar, 'similar earlier study', 'similar earlier studies') :
          count(r.similar, 'similar study', 'similar studies');
        say((r.existing ? 'Already filed on ' + when + ' (nothing new since): ' : what.charAt(0).toUpperCase() +
          what.substr(1) + ' of ' + listed + ' filed into '), link);
        status.append(copies);
      }, error: failure(mine) });
  }

  report.click(function(e) {
    e.preventDefault();
    file('similar-report', { limit: LIMIT, scope: scope() }, 'report');
  });

  // The patient's own priors only, whatever the scope chosen for the list.
  kos.click(function(e) {
    e.preventDefault();
    file('similar-kos', { limit: LIMIT }, 'key image selection');
  });

  $('#study').live('pagebeforecreate', function() {
    panel.insertAfter($('#list-series'));
  });
  // The list on screen is always the answer for the scope chosen, so that the SR files what the list shows.
  scopes.delegate('input', 'change', reset);
  $('#study').live('pagebeforeshow', bind);
  // Links between studies stay on the #study page: jQuery Mobile then shows no new page, and Orthanc Explorer
  // redraws the study from its own hashchange handler. Run after jQuery Mobile's handler has set pageData.
  $(window).bind('hashchange', function() { setTimeout(bind, 0); });
})();
